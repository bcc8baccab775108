-- table.insert at the front of a table whose __len claims 2^40 elements: 2^40 shifts inside C.
return { plan = function(ctx)
    local t = setmetatable({}, { __len = function() return 1 << 40 end })
    table.insert(t, 1, 'x')
    return { ports = ctx.ports }
end }
