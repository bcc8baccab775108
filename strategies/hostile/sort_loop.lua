-- Sorting a big table again and again.
return { plan = function(ctx)
    local t = {}
    for i = 1, 100000 do t[i] = (i * 7919) % 100003 end
    while true do
        table.sort(t)
    end
end }
